"""The ``fedhead`` command line: the one place that knows both the server and the sites."""
