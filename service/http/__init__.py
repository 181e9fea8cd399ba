"""The OpenAI-compatible HTTP door (`specserve serve --http-port N`): a second way into the same pairs.

    schema.py     the request and response bodies as pydantic models (OpenAI's shapes, plus specserve's
                  vendor fields); unknown request fields are ignored, as OpenAI's API does
    translate.py  an OpenAI request -> GenRequest (beside convert.gen_request_from_pb; shared rules in convert)
    app.py        the Starlette app: routes, bearer-token roles, errors in OpenAI's shape, server-sent events
    server.py     uvicorn on its own thread and event loop, TLS and bind address as the gRPC port's

gRPC stays the primary contract (proto/specserve/v1); this door maps onto it: the same registry and
engines, the same validation, status codes mapped to HTTP statuses (app.HTTP_STATUS), the same
token file and roles, the same TLS files. docs/api.md describes the endpoints.
"""
