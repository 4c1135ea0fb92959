"""Wire protocol of SAGE Edge: versioned .proto sources and their generated Python code.

Regenerate with ``python -m protos.generate``; ``tests/test_protos.py`` fails when the generated code is stale.
"""
