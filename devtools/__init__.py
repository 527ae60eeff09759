"""Development tools: the throw-away services helper shared by tests, bench, chaos and the demo."""
