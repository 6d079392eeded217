"""``msn serve``: an OpenAI-compatible local HTTP server for one model (FastAPI + uvicorn, SSE streaming).

Import :func:`msn.serve.app.create_app` for an app over an already-loaded model; fastapi is imported only
there, so ``msn --help`` never pays for it.
"""
