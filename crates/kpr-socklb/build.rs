//! Compiles `bpf/socklb.c` with clang when clang and the libbpf headers are there; otherwise the
//! crate builds without the object (`SocketLb::start` then says so): `cargo build` never needs a
//! C toolchain.
//!
//! Environment: `KPR_NO_BPF=1` builds without the object even when clang is found;
//! `KPR_REQUIRE_BPF=1` turns a missing toolchain or a compile error into a build failure (for CI);
//! `CLANG` names the compiler (default `clang`); `LIBBPF_INCLUDE` the directory holding
//! `bpf/bpf_helpers.h` (default `/usr/include`).

use std::path::{Path, PathBuf};
use std::process::Command;

const SOURCE: &str = "bpf/socklb.c";

fn main() {
    println!("cargo::rustc-check-cfg=cfg(kpr_bpf)");
    println!("cargo:rerun-if-changed={SOURCE}");
    for var in ["KPR_NO_BPF", "KPR_REQUIRE_BPF", "CLANG", "LIBBPF_INCLUDE"] {
        println!("cargo:rerun-if-env-changed={var}");
    }
    let require = std::env::var_os("KPR_REQUIRE_BPF").is_some_and(|v| v == "1");
    if std::env::var_os("KPR_NO_BPF").is_some_and(|v| v == "1") {
        println!(
            "cargo:warning=kpr-socklb: KPR_NO_BPF=1, building without the socket-lb BPF programs"
        );
        return;
    }
    match compile() {
        Ok(()) => println!("cargo:rustc-cfg=kpr_bpf"),
        Err(why) if require => panic!("kpr-socklb: KPR_REQUIRE_BPF=1 but {why}"),
        Err(why) => println!(
            "cargo:warning=kpr-socklb: building without the socket-lb BPF programs ({why}); \
             install clang and the libbpf headers (Debian: apt-get install clang libbpf-dev) \
             for --socket-lb"
        ),
    }
}

fn compile() -> Result<(), String> {
    let clang = std::env::var("CLANG").unwrap_or_else(|_| "clang".to_owned());
    let include =
        PathBuf::from(std::env::var("LIBBPF_INCLUDE").unwrap_or_else(|_| "/usr/include".into()));
    if !include.join("bpf/bpf_helpers.h").exists() {
        return Err(format!(
            "{} not found",
            include.join("bpf/bpf_helpers.h").display()
        ));
    }
    let version = Command::new(&clang).arg("--version").output();
    if !version.is_ok_and(|o| o.status.success()) {
        return Err(format!("`{clang}` not found"));
    }
    let out = PathBuf::from(std::env::var("OUT_DIR").map_err(|e| e.to_string())?).join("socklb.o");
    let mut cmd = Command::new(&clang);
    cmd.args(["-target", "bpf", "-O2", "-g", "-Wall", "-c", SOURCE, "-o"])
        .arg(&out)
        .arg(format!("-I{}", include.display()));
    // linux/types.h includes asm/types.h, which Debian keeps under the multiarch directory.
    if let Some(dir) = multiarch_include() {
        cmd.arg(format!("-I{}", dir.display()));
    }
    let result = cmd
        .output()
        .map_err(|e| format!("running `{clang}`: {e}"))?;
    let stderr = String::from_utf8_lossy(&result.stderr);
    if !result.status.success() {
        for line in stderr.lines() {
            println!("cargo:warning={line}");
        }
        return Err(format!("`{clang}` failed to compile {SOURCE}"));
    }
    for line in stderr.lines().filter(|l| l.contains("warning")) {
        println!("cargo:warning={line}");
    }
    Ok(())
}

fn multiarch_include() -> Option<PathBuf> {
    let arch = std::env::var("CARGO_CFG_TARGET_ARCH").ok()?;
    let triple = match arch.as_str() {
        "x86_64" => "x86_64-linux-gnu",
        "aarch64" => "aarch64-linux-gnu",
        "riscv64" => "riscv64-linux-gnu",
        "powerpc64" => "powerpc64le-linux-gnu",
        "s390x" => "s390x-linux-gnu",
        _ => return None,
    };
    let dir = Path::new("/usr/include").join(triple);
    dir.join("asm/types.h").exists().then_some(dir)
}
