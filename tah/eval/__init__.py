"""Evaluation: benchmark readers, graders, the harness over the engine, and analyses."""
