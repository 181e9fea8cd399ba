// Pins llm-d-inference-sim, the reference server of the model-server protocol that an inference
// gateway's endpoint picker reads; scripts/setup.sh builds it into .tools/ from the Go module proxy
// (tests/test_gateway_metrics.py compares its /metrics with specserve's).
module specserve.local/sim

go 1.25.7

require github.com/llm-d/llm-d-inference-sim v0.10.2
