"""Migrations: the Migration model and its operations (ops), and the runner shared by the
HTTP API and ``dbproxy migrate`` (runner)."""
