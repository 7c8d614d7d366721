"""The CLI's etcd options: where etcd is, TLS to it, its user (``scission up`` and every
command that reads or writes etcd). The password is never an option: a file, or the
environment variable ``SCISSION_ETCD_PASSWORD``."""

from __future__ import annotations

import argparse

from scission.registry.etcd_client import ETCD_PASSWORD_ENV


def add_etcd_args(p: argparse.ArgumentParser, inherited: bool = False) -> None:
    """--etcd-endpoints / --prefix / TLS / user. ``inherited``: on a subcommand of a parser
    that has them too; its defaults are suppressed so ``pools --prefix P scale ...`` keeps P."""
    default = argparse.SUPPRESS if inherited else None
    g = p.add_argument_group("etcd")
    g.add_argument("--etcd-endpoints", default=default if inherited else "",
                   help="comma-separated host:port (default: from `scission up`)")
    g.add_argument("--prefix", default=default,
                   help="registry key prefix (default: from `scission up`, else /scission)")
    add_etcd_client_args(g, default)


def add_etcd_client_args(g, default=None) -> None:
    """TLS to etcd (PEM files; without them plaintext) and etcd user/password auth."""
    g.add_argument("--etcd-cacert", default=default, metavar="PEM",
                   help="CA that signed etcd's server certificate: speak TLS to etcd")
    g.add_argument("--etcd-cert", default=default, metavar="PEM",
                   help="client certificate for etcd's --client-cert-auth (with --etcd-key)")
    g.add_argument("--etcd-key", default=default, metavar="PEM",
                   help="the client certificate's private key")
    g.add_argument("--etcd-user", default=default, metavar="NAME",
                   help="etcd user (etcd with `auth enable`); its password from "
                        f"--etcd-password-file, else ${ETCD_PASSWORD_ENV}")
    g.add_argument("--etcd-password-file", default=default, metavar="PATH",
                   help="file whose first line is the --etcd-user's password")


def add_embedded_etcd_args(g) -> None:
    """`scission up` options of the embedded etcd (no --etcd-endpoints)."""
    g.add_argument("--embedded-etcd-tls", action="store_true",
                   help="the embedded etcd serves only TLS with client certificates: a "
                        "private CA, server and client certificate are made at start (0600, "
                        "in its data dir, gone at stop); every component, and `status`/"
                        "`pools` on this host, use the client certificate")
