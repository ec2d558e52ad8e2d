//! Netlink framing: message headers, attributes (TLVs padded to 4 bytes) and nests, written
//! into one growing buffer. Pure; knows nothing of nf_tables semantics.

/// `NLA_F_NESTED`, set on every nested attribute (as nft sets it).
const NLA_F_NESTED: u16 = 0x8000;

pub(crate) const NLM_F_REQUEST: u16 = 0x1;
pub(crate) const NLM_F_ACK: u16 = 0x4;
pub(crate) const NLM_F_CREATE: u16 = 0x400;
pub(crate) const NLM_F_APPEND: u16 = 0x800;

/// A buffer of netlink messages under construction.
#[derive(Debug, Default)]
pub(crate) struct Buf {
    pub(crate) bytes: Vec<u8>,
}

impl Buf {
    pub(crate) fn with_capacity(n: usize) -> Buf {
        Buf {
            bytes: Vec::with_capacity(n),
        }
    }

    /// Starts a message: `nlmsghdr` then `nfgenmsg`. Returns its start, for [`Buf::end_msg`].
    pub(crate) fn begin_msg(
        &mut self,
        kind: u16,
        flags: u16,
        seq: u32,
        family: u8,
        res_id: u16,
    ) -> usize {
        let start = self.bytes.len();
        self.bytes.extend_from_slice(&0u32.to_ne_bytes()); // length, patched by end_msg
        self.bytes.extend_from_slice(&kind.to_ne_bytes());
        self.bytes.extend_from_slice(&flags.to_ne_bytes());
        self.bytes.extend_from_slice(&seq.to_ne_bytes());
        self.bytes.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel's
        self.bytes.push(family);
        self.bytes.push(0); // NFNETLINK_V0
        self.bytes.extend_from_slice(&res_id.to_be_bytes());
        start
    }

    pub(crate) fn end_msg(&mut self, start: usize) {
        let len = (self.bytes.len() - start) as u32;
        self.bytes[start..start + 4].copy_from_slice(&len.to_ne_bytes());
    }

    fn pad(&mut self) {
        let n = self.bytes.len().next_multiple_of(4);
        self.bytes.resize(n, 0);
    }

    /// An attribute with a raw payload.
    pub(crate) fn attr(&mut self, kind: u16, data: &[u8]) {
        self.bytes
            .extend_from_slice(&((4 + data.len()) as u16).to_ne_bytes());
        self.bytes.extend_from_slice(&kind.to_ne_bytes());
        self.bytes.extend_from_slice(data);
        self.pad();
    }

    /// A NUL-terminated string attribute.
    pub(crate) fn str(&mut self, kind: u16, s: &str) {
        self.bytes
            .extend_from_slice(&((4 + s.len() + 1) as u16).to_ne_bytes());
        self.bytes.extend_from_slice(&kind.to_ne_bytes());
        self.bytes.extend_from_slice(s.as_bytes());
        self.bytes.push(0);
        self.pad();
    }

    /// A big-endian u32 attribute (nf_tables' integers are network order).
    pub(crate) fn u32(&mut self, kind: u16, v: u32) {
        self.attr(kind, &v.to_be_bytes());
    }

    pub(crate) fn u64(&mut self, kind: u16, v: u64) {
        self.attr(kind, &v.to_be_bytes());
    }

    /// A nested attribute whose content `f` writes.
    pub(crate) fn nest(&mut self, kind: u16, f: impl FnOnce(&mut Buf)) {
        let start = self.bytes.len();
        self.bytes.extend_from_slice(&[0, 0]);
        self.bytes
            .extend_from_slice(&(kind | NLA_F_NESTED).to_ne_bytes());
        f(self);
        let len = (self.bytes.len() - start) as u16;
        self.bytes[start..start + 2].copy_from_slice(&len.to_ne_bytes());
    }
}

/// nft's user-data TLVs (libnftnl `nftnl_udata`): one byte type, one byte length, value.
#[derive(Debug, Default)]
pub(crate) struct Udata {
    pub(crate) bytes: Vec<u8>,
}

impl Udata {
    pub(crate) fn raw(&mut self, kind: u8, value: &[u8]) -> &mut Udata {
        self.bytes.push(kind);
        self.bytes.push(value.len() as u8);
        self.bytes.extend_from_slice(value);
        self
    }

    /// A NUL-terminated string (comments).
    pub(crate) fn str(&mut self, kind: u8, s: &str) -> &mut Udata {
        let mut v = s.as_bytes().to_vec();
        v.push(0);
        self.raw(kind, &v)
    }

    /// A host-order u32 (libnftnl writes these natively).
    pub(crate) fn u32(&mut self, kind: u8, v: u32) -> &mut Udata {
        self.raw(kind, &v.to_ne_bytes())
    }

    /// A nested record whose content `f` writes.
    pub(crate) fn nest(&mut self, kind: u8, f: impl FnOnce(&mut Udata)) -> &mut Udata {
        let mut inner = Udata::default();
        f(&mut inner);
        self.raw(kind, &inner.bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attributes_are_padded_and_nests_measured() {
        let mut b = Buf::default();
        b.str(1, "kq");
        assert_eq!(b.bytes, [7, 0, 1, 0, b'k', b'q', 0, 0]);
        let mut b = Buf::default();
        b.nest(4, |b| b.u32(1, 4));
        assert_eq!(b.bytes, [12, 0, 4, 0x80, 8, 0, 1, 0, 0, 0, 0, 4]);
        let mut u = Udata::default();
        u.str(0, "x").u32(7, 2);
        assert_eq!(u.bytes, [0, 2, b'x', 0, 7, 4, 2, 0, 0, 0]);
    }

    #[test]
    fn a_message_carries_its_length_and_nfgenmsg() {
        let mut b = Buf::default();
        let m = b.begin_msg(0x0a00, NLM_F_REQUEST, 9, 2, 0);
        b.str(1, "t");
        b.end_msg(m);
        assert_eq!(b.bytes.len(), 20 + 8);
        assert_eq!(
            u32::from_ne_bytes([b.bytes[0], b.bytes[1], b.bytes[2], b.bytes[3]]),
            28
        );
        assert_eq!(b.bytes[16], 2);
    }
}
