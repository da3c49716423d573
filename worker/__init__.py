"""The worker process and the embedded dev-server bootstrap."""
