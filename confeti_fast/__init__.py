"""confeti_fast: CONFETI unsupervised domain-adaptive semantic segmentation, fast."""
import importlib.abc
import importlib.util
import os
import sys

__version__ = "0.1.0"

_CHECKOUT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class _CheckoutFinder(importlib.abc.MetaPathFinder):
    """`kernels/` and `configs/` sit at the top of the repository; setup.py maps them into the
    package only on install. In a source checkout used in place (PYTHONPATH=<repo>, no install)
    this finder resolves `confeti_fast.kernels` / `.configs` to the checkout's folders (their
    submodules follow through submodule_search_locations). It is first on sys.meta_path so the
    kernels always come from the checkout this package was imported from, even where an
    editable install of another checkout maps the names elsewhere; it answers only beside a
    setup.py, so in a normal install (the folders inside the package) it never does."""

    _names = {f"{__name__}.{name}": os.path.join(_CHECKOUT, name) for name in ("kernels", "configs")}

    def find_spec(self, fullname, path=None, target=None):
        folder = self._names.get(fullname)
        init = folder and os.path.join(folder, "__init__.py")
        if not init or not os.path.isfile(init) or not os.path.isfile(os.path.join(_CHECKOUT, "setup.py")):
            return None
        return importlib.util.spec_from_file_location(fullname, init, submodule_search_locations=[folder])


if not any(isinstance(finder, _CheckoutFinder) for finder in sys.meta_path):
    sys.meta_path.insert(0, _CheckoutFinder())
