"""Every `Example:` of keras_rdrop's docstrings runs, on the current backend.

All modules of the package are found with `pkgutil.walk_packages` (no module
names are written here), and with them every class, function and method
defined in them. Each docstring's ```python fenced blocks are executed and its
`>>>` examples run as doctests (with `ELLIPSIS`), one test per object, in the
namespace of the module that defines the object, in a temporary directory.
"""

import doctest
import importlib
import inspect
import pkgutil
import re

import pytest

import keras_rdrop

# Objects whose examples must be found: if the walk below stopped finding
# them, the suite would pass by running nothing.
KNOWN_EXAMPLES = {
    "RDropModel",
    "ReferenceKLRegularizer",
    "SymmetricKLDivergence",
    "kl_divergence",
    "symmetric_kl_divergence",
}

FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)

# Examples known to be broken, by `__qualname__` (module paths are moving), with
# the reason; they run as strict xfails so that a fix is noticed: remove the
# entry then. Empty when every example runs.
# Objects whose example is known to be wrong, with the reason (strict xfail).
BROKEN: dict[str, str] = {}


def package_modules():
    def fail(name):
        raise ImportError(f"cannot import {name} while walking keras_rdrop")

    names = [keras_rdrop.__name__]
    for info in pkgutil.walk_packages(
        keras_rdrop.__path__, keras_rdrop.__name__ + ".", onerror=fail
    ):
        names.append(info.name)
    return [importlib.import_module(name) for name in sorted(set(names))]


def _members(module):
    """Functions, classes and their methods defined in `module`."""
    for _, obj in vars(module).items():
        if getattr(obj, "__module__", None) != module.__name__:
            continue
        if inspect.isfunction(obj):
            yield obj
        elif inspect.isclass(obj):
            yield obj
            for attribute in vars(obj).values():
                if isinstance(attribute, (staticmethod, classmethod)):
                    attribute = attribute.__func__
                elif isinstance(attribute, property):
                    attribute = attribute.fget
                if inspect.isfunction(attribute):
                    yield attribute


def examples(doc):
    """`(python blocks, text left for doctest)` of a docstring."""
    blocks = [code for lang, code in FENCE.findall(doc) if lang == "python"]
    return blocks, FENCE.sub("", doc)


def collect():
    found = {}
    for module in package_modules():
        for obj in _members(module):
            # The object's own docstring: `inspect.getdoc` would inherit
            # Keras' docstrings for overridden methods.
            doc = obj.__doc__
            if not isinstance(doc, str) or not doc.strip():
                continue
            doc = inspect.cleandoc(doc)
            blocks, rest = examples(doc)
            if not blocks and ">>>" not in rest:
                continue
            name = f"{obj.__module__}.{obj.__qualname__}"
            found[name] = (module, obj, blocks, rest)
    return found


EXAMPLES = collect()


def _params():
    params = []
    for name in sorted(EXAMPLES):
        marks = []
        qualname = EXAMPLES[name][1].__qualname__
        if qualname in BROKEN:
            marks.append(pytest.mark.xfail(reason=BROKEN[qualname], strict=True))
        params.append(pytest.param(name, marks=marks, id=name))
    return params


def test_known_examples_are_collected():
    short_names = {name.rsplit(".", 1)[-1] for name in EXAMPLES}
    assert KNOWN_EXAMPLES <= short_names, (
        f"missing: {sorted(KNOWN_EXAMPLES - short_names)}; collected: "
        f"{sorted(EXAMPLES)}"
    )


def test_collection_splits_fences_from_doctests():
    doc = (
        "Summary.\n\nFormula:\n\n```\nx = 1\n```\n\nExample:\n\n```python\n"
        "y = 2\n```\n\n>>> 1 + 1\n2\n"
    )
    blocks, rest = examples(doc)
    assert blocks == ["y = 2\n"]
    assert ">>> 1 + 1" in rest and "x = 1" not in rest and "y = 2" not in rest


@pytest.mark.parametrize("name", _params())
def test_docstring_example_runs(name, tmp_path, monkeypatch):
    module, obj, blocks, rest = EXAMPLES[name]
    monkeypatch.chdir(tmp_path)  # examples may save files
    for i, code in enumerate(blocks):
        namespace = dict(vars(module))
        namespace["__name__"] = f"{name}.example_{i}"
        exec(compile(code, f"<{name} example {i}>", "exec"), namespace)
    if ">>>" in rest:
        test = doctest.DocTestParser().get_doctest(
            rest, dict(vars(module)), name, f"docstring of {name}", 0
        )
        report = []
        runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS, verbose=False)
        runner.run(test, out=report.append)
        assert test.examples, f"{name}: no doctest example parsed"
        assert runner.failures == 0, "".join(report)
