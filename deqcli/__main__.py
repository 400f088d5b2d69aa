"""``python -m deqcli`` runs the command line."""

from deqcli.cli import app

app(prog_name="deq")
