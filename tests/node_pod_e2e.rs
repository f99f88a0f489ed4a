//! Node volumes and the pod's own processes, told apart by their cgroup: `onChange` signals
//! reach the volume's pod only (processes found by name through the node's PID view), and the
//! broker API in an `api: "true"` volume serves the pod's processes only.

mod common;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::load::PodCgroup;
use common::node::*;

struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_change_signals_the_pods_own_process_only() {
    let (_tmp, root) = local_setup("S3cret-notify-v1", "[db]");
    let pod = Pod::new("team-a", "api", 77);
    let cg = PodCgroup::new(&pod.uid);
    // Two processes named "hupwatch": one in the pod's cgroup, one elsewhere on the node.
    assert!(
        Command::new("cp")
            .arg("/bin/bash")
            .arg(root.join("hupwatch"))
            .status()
            .unwrap()
            .success()
    );
    let spawn = |log: &str| {
        Proc(
            Command::new(root.join("hupwatch"))
                .arg("-c")
                .arg(format!(
                    "trap 'echo hup >> {}' USR1; touch {}; while true; do sleep 0.05; done",
                    root.join(log).display(),
                    root.join(format!("{log}-ready")).display()
                ))
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap(),
        )
    };
    let inside = spawn("inside");
    let _outside = spawn("outside");
    // Before their traps are set, the signal would end them (USR1, not HUP: a run under
    // nohup ignores SIGHUP, and bash cannot trap a signal ignored at entry): wait until both say they are ready.
    let deadline = Instant::now() + Duration::from_secs(120);
    while !(root.join("inside-ready").exists() && root.join("outside-ready").exists()) {
        assert!(
            Instant::now() < deadline,
            "the test processes did not start"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    std::fs::write(cg.pod.join("cgroup.procs"), inside.0.id().to_string()).unwrap();

    let d = Daemon::start_with(&root, "1s");
    let mut node = client(&d).await;
    let req = pod.request_with(
        &root,
        &[
            ("provider", "local"),
            ("volumeType", "tmpfs"),
            ("objects", "- objectName: password\n  object: db\n"),
            ("onChange", "- signal: {process: hupwatch, signal: USR1}\n"),
        ],
        None,
    );
    node.node_publish_volume(req)
        .await
        .unwrap_or_else(|e| panic!("{e:?}\n{}", d.logs()));
    std::fs::write(root.join("secrets/db"), "S3cret-notify-v2").unwrap();
    let count = |f: &str| {
        std::fs::read_to_string(root.join(f))
            .unwrap_or_default()
            .lines()
            .count()
    };
    let deadline = Instant::now() + Duration::from_secs(120);
    while count("inside") < 1 {
        assert!(
            Instant::now() < deadline,
            "no signal to the pod's process\n{}",
            d.logs()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(count("inside"), 1, "one rotation, one signal");
    assert_eq!(
        count("outside"),
        0,
        "a process of the same name outside the pod is left alone"
    );
    let notice = format!("onChange signal {} to hupwatch", libc::SIGUSR1);
    common::audit_text_when(&root.join("audit.jsonl"), "the notice", |a| {
        a.contains(&notice)
    });
    node.node_unpublish_volume(pod.unpublish(&root))
        .await
        .unwrap();
    drop(inside);
    // A bad onChange is refused, naming the field.
    let bad = Pod::new("team-a", "api", 78);
    let e = node
        .node_publish_volume(bad.request_with(
            &root,
            &[
                ("provider", "local"),
                ("objects", "- objectName: password\n  object: db\n"),
                ("onChange", "- signal: {process: hupwatch, signal: KILL}\n"),
            ],
            None,
        ))
        .await
        .unwrap_err();
    assert!(
        e.message().contains("onChange[0].signal.signal"),
        "{}",
        e.message()
    );
}

/// `api: "true"`: the broker API on a socket inside the tmpfs volume serves a process of the
/// volume's pod (whatever its uid) and refuses, and audits, a caller from elsewhere on the node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_volume_broker_api_serves_the_pods_processes_only() {
    use keybroker_csi::broker_pb::{self as pb, broker_client::BrokerClient};
    let (_tmp, root) = local_setup(r#"{"password":"S3cret-api-v1"}"#, "[db]");
    let pod = Pod::new("team-a", "api", 81);
    let cg = PodCgroup::new(&pod.uid);
    let d = Daemon::start_with(&root, "1s");
    let mut node = client(&d).await;
    // A FUSE volume cannot hold the socket: refused, naming the fix.
    let e = node
        .node_publish_volume(pod.request_with(
            &root,
            &[
                ("provider", "local"),
                ("volumeType", "fuse"),
                ("api", "true"),
                (
                    "objects",
                    "- objectName: password\n  object: db\n  key: password\n",
                ),
            ],
            None,
        ))
        .await
        .unwrap_err();
    assert!(e.message().contains("volumeType: tmpfs"), "{}", e.message());
    node.node_publish_volume(pod.request_with(
        &root,
        &[
            ("provider", "local"),
            ("volumeType", "tmpfs"),
            ("api", "true"),
            (
                "objects",
                "- objectName: password\n  object: db\n  key: password\n",
            ),
        ],
        None,
    ))
    .await
    .unwrap_or_else(|e| panic!("{e:?}\n{}", d.logs()));
    let sock = pod.target(&root).join("..keybroker.sock");
    assert!(sock.exists(), "the socket is in the volume");
    // A socket address holds at most 107 bytes; this test's kubelet path is longer (a pod sees
    // the volume at its short mount path): clients connect through a short link.
    let sock_path = sock.clone();
    let sock = root.join("api.sock");
    std::os::unix::fs::symlink(&sock_path, &sock).unwrap();

    // A process of the pod (moved into its cgroup first), as an ordinary uid: served.
    let in_pod = |script: &str| {
        let out = Command::new("sh")
            .arg("-c")
            .arg(format!(
                "echo $$ > {}/cgroup.procs && exec setpriv --reuid 65534 --regid 65534 --clear-groups -- {} -c \"$0\"",
                cg.pod.display(),
                common::peers::peers_python().display()
            ))
            .arg(script)
            .output()
            .unwrap();
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    };
    let get = format!(
        "import grpc\nch = grpc.insecure_channel('unix://{}')\nf = ch.unary_unary('/keybroker.v1.Broker/Get', request_serializer=lambda b: b, response_deserializer=lambda b: b)\ntry:\n    print(f(b'\\n\\x08password', timeout=10))\nexcept grpc.RpcError as e:\n    print(e.code(), e.details())\n",
        sock.display()
    );
    let said = in_pod(&get);
    assert!(said.contains("S3cret-api-v1"), "{said}\n{}", d.logs());
    // Rotation reaches the API.
    std::fs::write(root.join("secrets/db"), r#"{"password":"S3cret-api-v2"}"#).unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let said = in_pod(&get);
        if said.contains("S3cret-api-v2") {
            break;
        }
        assert!(Instant::now() < deadline, "rotation not served: {said}");
        std::thread::sleep(Duration::from_millis(300));
    }

    // This test process is root but not in the pod: refused and audited.
    let mut c = BrokerClient::new(keybroker_csi::connect_unix(&sock).await.unwrap());
    let e = c
        .get(pb::GetRequest {
            name: "password".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{}", e.message());
    assert!(e.message().contains("only pod"), "{}", e.message());
    let e = c.list(pb::ListRequest {}).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied);
    node.node_unpublish_volume(pod.unpublish(&root))
        .await
        .unwrap();
    assert!(!sock_path.exists(), "the socket goes with the volume");
    let refusal = format!("only pod {} may use", pod.uid);
    let audit = common::audit_text_when(
        &root.join("audit.jsonl"),
        "the broker read and the refusal",
        |a| a.contains("broker Get") && a.contains(&refusal),
    );
    assert!(!audit.contains("S3cret-api"));
    drop(cg);
}
