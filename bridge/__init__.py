"""Git-bus bridge: run allowlisted presets on a self-hosted Mac and read back evidence."""
