"""secondsitectl: the administrator's command line over D-Bus."""
