"""The agent runtime: the watch-render-apply loop, its service, health, status, audit and state dir."""
