"""specserve service layer: gRPC servicers, params, scheduler, speculative decoding, tokenizer."""
