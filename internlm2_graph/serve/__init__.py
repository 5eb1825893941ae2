"""`internlm2-graph serve`: an OpenAI-compatible server for a built folder, on og.Engine.

- engine.py: EngineBackend, the og.Engine with its driver thread, prompts and tokenizers;
- protocol.py: the request bodies, checked, and OpenAI's error body;
- tools.py: InternLM2's tool-call format, rendered into prompts and parsed out of replies;
- app.py: `create_app(backend, model_name)`, the FastAPI routes.

Needs the `serve` extra (FastAPI, uvicorn): nothing here is imported by the rest of the package.
"""
