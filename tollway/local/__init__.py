"""What runs on a machine with nothing installed: embedded PostgreSQL, Redis and a local model
(``embedded``), and the scripted OpenAI/vLLM-compatible upstream (``sim``)."""
