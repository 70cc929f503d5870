pytest_plugins = ["billstream_testing.fixtures"]
