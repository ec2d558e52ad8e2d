//! Filtering and formatting of `kube-proxy-rs conntrack` over synthetic flows.

use super::*;

fn sa(s: &str) -> SocketAddr {
    s.parse().unwrap_or_else(|_| panic!("{s}"))
}

fn flow(proto: u8, orig: (&str, &str), reply: (&str, &str)) -> Flow {
    Flow::new(proto, (sa(orig.0), sa(orig.1)), (sa(reply.0), sa(reply.1)))
}

/// `/debug/services?service=default/web` as the proxy writes it (fields not read here
/// included, as they come).
fn ports() -> Vec<PortView> {
    let json = r#"[
      {"family":"IPv4","servicePort":"default/web:echo","namespace":"default","service":"web",
       "portName":"echo","protocol":"TCP","clusterIp":"172.30.0.10","port":9000,
       "nodePort":30090,"externalIps":[],"loadBalancerIps":["1.2.3.4"],"sourceRanges":[],
       "internal":"Cluster","endpoints":[
         {"address":"10.0.0.12:9000","ready":true,"serving":true,"terminating":false,
          "local":true,"node":"node-a","zone":null,"cluster":true,"localSet":true},
         {"address":"10.0.0.13:9000","ready":false,"serving":true,"terminating":true,
          "local":true,"node":"node-a","zone":null,"cluster":true,"localSet":true},
         {"address":"10.0.0.14:9000","ready":false,"serving":false,"terminating":false,
          "local":true,"node":"node-a","zone":null,"cluster":false,"localSet":false}]},
      null,
      {"family":"IPv4","servicePort":"default/web:dns","namespace":"default","service":"web",
       "portName":"dns","protocol":"UDP","clusterIp":"172.30.0.10","port":53,"nodePort":null,
       "externalIps":["192.168.99.1"],"loadBalancerIps":[],"endpoints":[
         {"address":"10.0.0.12:5353","ready":true,"serving":true,"terminating":false}]}
    ]"#;
    let ports: Vec<Option<PortView>> = serde_json::from_str(json).unwrap_or_default();
    ports.into_iter().flatten().collect()
}

fn flows() -> Vec<Flow> {
    let client = ("10.0.0.5:40000", "10.0.0.5:40000");
    vec![
        // 0: ClusterIP to a removed endpoint.
        flow(
            TCP,
            (client.0, "172.30.0.10:9000"),
            ("10.0.0.11:9000", client.1),
        ),
        // 1: ClusterIP to a ready endpoint.
        flow(
            TCP,
            ("10.0.0.5:40001", "172.30.0.10:9000"),
            ("10.0.0.12:9000", "10.0.0.5:40001"),
        ),
        // 2: NodePort on a local address, masqueraded, to a removed endpoint.
        flow(
            TCP,
            ("203.0.113.7:5000", "192.168.0.2:30090"),
            ("10.0.0.11:9000", "10.0.0.1:61000"),
        ),
        // 3: NodePort on an address not known to be local, to a current endpoint.
        flow(
            TCP,
            ("203.0.113.7:5001", "192.168.0.9:30090"),
            ("10.0.0.12:9000", "10.0.0.1:61001"),
        ),
        // 4: the NodePort's number on another host, elsewhere: not ours.
        flow(
            TCP,
            ("203.0.113.7:5002", "192.168.0.9:30090"),
            ("10.0.0.99:9000", "203.0.113.7:5002"),
        ),
        // 5: UDP to the ClusterIP, a ready endpoint.
        flow(
            UDP,
            ("10.0.0.5:40053", "172.30.0.10:53"),
            ("10.0.0.12:5353", "10.0.0.5:40053"),
        ),
        // 6: UDP cached while the Service had no endpoints: not DNATed.
        flow(
            UDP,
            ("10.0.0.5:40054", "172.30.0.10:53"),
            ("172.30.0.10:53", "10.0.0.5:40054"),
        ),
        // 7: the right address and port, the wrong protocol.
        flow(
            UDP,
            ("10.0.0.5:40055", "172.30.0.10:9000"),
            ("10.0.0.12:9000", "10.0.0.5:40055"),
        ),
        // 8: the LB IP, a terminating endpoint.
        flow(
            TCP,
            ("203.0.113.7:5003", "1.2.3.4:9000"),
            ("10.0.0.13:9000", "10.0.0.1:61003"),
        ),
        // 9: another ClusterIP.
        flow(
            TCP,
            ("10.0.0.5:40002", "172.30.0.99:9000"),
            ("10.0.0.11:9000", "10.0.0.5:40002"),
        ),
        // 10: the externalIP of the UDP port, a not-ready endpoint of the other port.
        flow(
            UDP,
            ("203.0.113.7:5004", "192.168.99.1:53"),
            ("10.0.0.14:9000", "203.0.113.7:5004"),
        ),
    ]
}

fn local() -> Vec<IpAddr> {
    vec!["192.168.0.2".parse().unwrap_or(IpAddr::from([0, 0, 0, 0]))]
}

#[test]
fn a_services_flows_are_those_to_its_frontends_with_their_endpoints_state() {
    let ports = ports();
    assert_eq!(ports.len(), 2, "the null entry is skipped");
    let all = flows();
    let got = service_flows(&all, &ports, &local());
    let line = |f: &FlowView| {
        format!(
            "{} {} {} {} {} {}",
            f.protocol,
            f.client,
            f.frontend_kind.unwrap_or(""),
            f.endpoint.map_or_else(|| "-".into(), |e| e.to_string()),
            f.endpoint_state.map_or("", EndpointState::as_str),
            if f.stale { "STALE" } else { "ok" },
        )
    };
    let lines: Vec<String> = got.iter().map(line).collect();
    assert_eq!(
        lines,
        [
            "udp 10.0.0.5:40054 clusterIP - none STALE",
            "udp 10.0.0.5:40053 clusterIP 10.0.0.12:5353 ready ok",
            "udp 203.0.113.7:5004 externalIP 10.0.0.14:9000 stale STALE",
            "tcp 10.0.0.5:40000 clusterIP 10.0.0.11:9000 stale STALE",
            "tcp 203.0.113.7:5000 nodePort 10.0.0.11:9000 stale STALE",
            "tcp 10.0.0.5:40001 clusterIP 10.0.0.12:9000 ready ok",
            "tcp 203.0.113.7:5001 nodePort 10.0.0.12:9000 ready ok",
            "tcp 203.0.113.7:5003 loadBalancerIP 10.0.0.13:9000 terminating ok",
        ]
    );
    let masq = got
        .iter()
        .find(|f| f.client == sa("203.0.113.7:5000"))
        .and_then(|f| f.masqueraded_as);
    assert_eq!(masq, Some(sa("10.0.0.1:61000")));

    let counts: Vec<String> = endpoint_counts(&got, &ports)
        .iter()
        .map(|c| {
            format!(
                "{} {} {} {}",
                c.service_port.as_deref().unwrap_or(""),
                c.endpoint.map_or_else(|| "-".into(), |e| e.to_string()),
                c.state.map_or("", EndpointState::as_str),
                c.flows
            )
        })
        .collect();
    assert_eq!(
        counts,
        [
            "default/web:dns - none 1",
            "default/web:dns 10.0.0.12:5353 ready 1",
            "default/web:dns 10.0.0.14:9000 stale 1",
            "default/web:echo 10.0.0.11:9000 stale 2",
            "default/web:echo 10.0.0.12:9000 ready 2",
            "default/web:echo 10.0.0.13:9000 terminating 1",
            "default/web:echo 10.0.0.14:9000 not-ready 0",
        ]
    );
}

#[test]
fn without_the_node_s_addresses_a_node_port_flow_to_a_gone_endpoint_is_not_claimed() {
    let got = service_flows(&flows(), &ports(), &[]);
    assert!(got.iter().all(|f| f.client != sa("203.0.113.7:5000")));
    assert!(got.iter().any(|f| f.client == sa("203.0.113.7:5001")));
}

#[test]
fn raw_flows_to_a_destination_as_sent_or_as_dnated() {
    let all = flows();
    let got = flows_to(&all, sa("10.0.0.11:9000"), Some(TCP));
    let clients: Vec<String> = got.iter().map(|f| f.client.to_string()).collect();
    assert_eq!(
        clients,
        ["10.0.0.5:40000", "10.0.0.5:40002", "203.0.113.7:5000"]
    );
    assert!(got.iter().all(|f| f.endpoint_state.is_none() && !f.stale));
    assert_eq!(flows_to(&all, sa("172.30.0.10:9000"), None).len(), 3);
    assert_eq!(flows_to(&all, sa("172.30.0.10:9000"), Some(UDP)).len(), 1);
    let counts = endpoint_counts(&got, &[]);
    assert_eq!(counts.len(), 1);
    assert_eq!(counts[0].flows, 3);
}

#[test]
fn text_shows_each_flow_the_counts_and_how_many_are_stale() {
    let ports = ports();
    let mut all = flows();
    all[0].state = Some(3);
    all[0].timeout = Some(86399);
    let flows = service_flows(&all[..2], &ports, &local());
    let report = Report {
        service: Some("default/web".into()),
        to: None,
        service_ports: vec![PortSearched {
            service_port: "default/web:echo".into(),
            protocol: "TCP".into(),
            frontends: vec![sa("172.30.0.10:9000"), sa("1.2.3.4:9000")],
            node_port: Some(30090),
        }],
        endpoints: endpoint_counts(&flows, &ports[..1]),
        flows,
    };
    let expected = "\
default/web: 2 conntrack flows
  default/web:echo TCP 172.30.0.10:9000 1.2.3.4:9000 nodePort 30090

PROTO  CLIENT          FRONTEND                      ENDPOINT        ENDPOINT IS  STATE        TIMEOUT
tcp    10.0.0.5:40000  172.30.0.10:9000 (clusterIP)  10.0.0.11:9000  stale        ESTABLISHED  86399s
tcp    10.0.0.5:40001  172.30.0.10:9000 (clusterIP)  10.0.0.12:9000  ready        -            -

ENDPOINT        SERVICE PORT      IS           FLOWS
10.0.0.11:9000  default/web:echo  stale        1
10.0.0.12:9000  default/web:echo  ready        1
10.0.0.13:9000  default/web:echo  terminating  0
10.0.0.14:9000  default/web:echo  not-ready    0

1 flow still goes to an endpoint the Service no longer has (stale)
";
    assert_eq!(text(&report), expected);
    let json = serde_json::to_value(&report).unwrap_or_default();
    assert_eq!(json["flows"][0]["endpointState"], "stale");
    assert_eq!(json["flows"][0]["stale"], true);
    assert_eq!(json["flows"][0]["state"], "ESTABLISHED");
    assert_eq!(json["flows"][0]["timeoutSeconds"], 86399);
    assert_eq!(json["flows"][0]["frontendKind"], "clusterIP");
    assert!(json.get("to").is_none());
}

#[test]
fn arguments_are_checked() {
    let args = |s: &str| -> Vec<String> { s.split_whitespace().map(str::to_owned).collect() };
    let a = parse_args(&args(
        "--service default/web --port=dns -o json --proto UDP",
    ))
    .unwrap_or_default();
    assert_eq!(a.service.as_deref(), Some("default/web"));
    assert_eq!(a.port.as_deref(), Some("dns"));
    assert_eq!(a.proto, Some(UDP));
    assert!(a.json);
    assert_eq!(a.server, "http://127.0.0.1:10249");
    let raw = parse_args(&args("--to [fd00::1]:53")).unwrap_or_default();
    assert_eq!(raw.to, Some(sa("[fd00::1]:53")));
    for bad in [
        "",
        "--service web",
        "--service default/Web",
        "--service default/web --to 1.2.3.4:80",
        "--to 1.2.3.4",
        "--to 1.2.3.4:0",
        "--to 1.2.3.4:80 --port http",
        "--to 1.2.3.4:80 --proto icmp",
        "--service default/web -o yaml",
        "--service default/web --bogus",
        "--service",
    ] {
        assert!(
            parse_args(&args(bad)).is_err_and(|e| !e.is_empty()),
            "{bad:?}"
        );
    }
    assert!(parse_args(&args("--help")).is_err_and(|e| e.is_empty()));
}
