"""`edge-genarm serve`: the OpenAI API over the scheduler.

    cli.py       the command: options, socket, uvicorn
    app.py       FastAPI routes, auth, errors, metrics, streaming
    protocol.py  OpenAI's request and response shapes (pydantic), refusals as data
    worker.py    the one thread that steps every model's scheduler and routes its events
"""
