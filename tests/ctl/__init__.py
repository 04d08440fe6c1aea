"""secondsitectl: renderers and every subcommand against a stand-in client."""
