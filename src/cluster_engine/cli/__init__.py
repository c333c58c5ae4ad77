"""The ``cluster-engine`` command: the server and database commands and the ``images`` commands."""
