"""The process server: accepts agent streams, spools them crash-safely, forwards them."""
