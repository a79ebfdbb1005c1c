"""The pool's backends: how each pool model is answered (the shared stand-in engine, vLLM engines,
OpenAI-compatible endpoints), the one retry policy, failure classes and the cool-down of failing backends."""
