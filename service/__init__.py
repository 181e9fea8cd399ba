"""specserve's service, in layers, each a folder; a layer imports only those before it
(tests/test_layers.py):

    common -> config -> fit -> engine (spec/) -> pairs -> edge -> rpc | http -> server.py -> cli

docs/design.md says what each holds.
"""
