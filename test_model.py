"""
nanoCog's test suite: `python test_model.py` runs every test in tests/ through pytest (extra arguments go to pytest,
e.g. `python test_model.py -x -k kernel`). tests/test_reference.py comes first: the definition of Cog attention against
an independent computation, which every fused kernel is then checked against (tests/test_kernel.py).
"""

import os
import sys

if __name__ == "__main__":
    # pytest becomes this process's main module: the worker processes that data preparation spawns import the main
    # module again, and pytest's takes a fraction of a second where one that imports torch and triton takes seconds
    tests = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tests")
    order = ["test_reference.py"] + sorted(f for f in os.listdir(tests) if f.startswith("test_") and f.endswith(".py")
                                           and f != "test_reference.py")
    os.execv(sys.executable, [sys.executable, "-m", "pytest", "-q", *(os.path.join(tests, f) for f in order),
                              *sys.argv[1:]])
