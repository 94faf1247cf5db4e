"""Development tools: the demo and a local `lethe serve` subprocess."""
