"""The OpenAI-compatible HTTP door (`specserve serve --http-port N`): a second way into the same pairs.

    schema.py     the request and response bodies as pydantic models (OpenAI's shapes, plus specserve's
                  vendor fields); unknown request fields are ignored, as OpenAI's API does
    translate.py  an OpenAI request -> GenRequest (the rules both doors share: service/edge/rules.py)
    app.py        the Starlette app: routes, request ids, bearer-token roles, bounds, metrics
    generation.py one generation seen from asyncio (the engine's stream bridged to the event loop)
    shapes.py     engine results -> OpenAI's response bodies (chat, text completion, usage, logprobs)
    sse.py        server-sent events, with the client's disconnect seen at once
    errors.py     errors in OpenAI's shape, with the HTTP status of the gRPC code
    server.py     uvicorn on its own thread and event loop, TLS and bind address as the gRPC port's

gRPC stays the primary contract (proto/specserve/v1); this door maps onto it: the same registry and
engines, the same validation, status codes mapped to HTTP statuses (errors.HTTP_STATUS), the same
token file and roles, the same TLS files. docs/api.md describes the endpoints.
"""
