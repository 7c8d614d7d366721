"""``scission status`` when etcd does not answer: one clear line and a non-zero exit code,
not a traceback."""

from __future__ import annotations

from scission.cluster.cli import main


def test_status_against_a_dead_etcd_says_unreachable(free_port, capsys):
    """Nothing listens on the endpoint: exit 1 and 'etcd unreachable at <endpoint>' on
    stderr, nothing on stdout."""
    endpoint = f"127.0.0.1:{free_port}"
    code = main(["status", "--etcd-endpoints", endpoint])
    out, err = capsys.readouterr()
    assert code == 1
    assert out == ""
    assert err.startswith(f"scission: error: etcd unreachable at {endpoint}")
    assert "Traceback" not in err
