"""The package's folders are its layers (tests/import_graph.py gives the order): no circle of imports, no import from
a folder above, and docs/layout.md names every module there is and none that is not."""

import re
from pathlib import Path

from import_graph import PACKAGE, circles, climbs, graph, modules


def test_no_circle_and_no_import_climbs_a_layer():
    edges = graph()
    assert circles(edges) == []
    assert climbs(edges) == []


def test_the_graph_sees_imports_inside_functions_and_from_packages(tmp_path):
    """The checks above could pass by not seeing an import: a lazy import that climbs is found."""
    package = tmp_path / "diffusion_lit"
    for folder in ("core", "model"):
        (package / folder).mkdir(parents=True)
        (package / folder / "__init__.py").write_text("")
    (package / "__init__.py").write_text("")
    (package / "core" / "a.py").write_text("def f():\n    from diffusion_lit.model import b\n")
    (package / "model" / "b.py").write_text("from diffusion_lit.core.a import f\n")
    edges = graph(package)
    assert edges["diffusion_lit.core.a"] == {"diffusion_lit.model.b"}
    assert climbs(edges) == [("diffusion_lit.core.a", "diffusion_lit.model.b")]
    assert circles(edges) == [["diffusion_lit.core.a", "diffusion_lit.model.b"]]


def test_docs_layout_maps_every_module():
    layout = (PACKAGE.parent / "docs" / "layout.md").read_text()
    named = set(re.findall(r"diffusion_lit/[\w/]+\.py", layout))
    there = {path.relative_to(PACKAGE.parent).as_posix() for path in modules().values()}
    assert named == there, (f"missing from docs/layout.md: {sorted(there - named)}; "
                            f"named there but gone: {sorted(named - there)}")


def test_each_sampler_is_one_object_of_one_shape_in_one_table():
    """A sampler checks its own settings and draws; nothing else branches on a sampler's name."""
    from typing import get_args

    from diffusion_lit.sampling.samplers import SAMPLERS, Sampler, SamplerName

    assert set(SAMPLERS) == set(get_args(SamplerName))
    assert all(isinstance(s, Sampler) and s.name == name for name, s in SAMPLERS.items())
    branching = [f"{path.relative_to(PACKAGE.parent)}:{i}" for path in modules().values()
                 for i, line in enumerate(path.read_text().splitlines(), 1)
                 if re.search(r"sampler\s*(==|!=|in \()", line)]
    assert branching == []


def test_the_table_of_moved_names_points_at_modules_that_exist_and_leaves_new_paths_alone():
    import importlib

    from diffusion_lit.core.moved import CLASSES, MOVED, moved, upgrade_paths

    for old, new in MOVED.items():
        importlib.import_module(f"diffusion_lit.{new}")
        assert not (PACKAGE / f"{old}.py").exists()  # no module left at the old place
    for old, new in CLASSES.items():
        module, name = new.rsplit(".", 1)
        assert hasattr(importlib.import_module(module), name), new
    assert moved("diffusion_lit.process.Flow") == "diffusion_lit.model.process.Flow"
    assert moved("diffusion_lit.diffusers_io.InitFrom") == "diffusion_lit.training.init_from.InitFrom"
    assert moved("diffusion_lit.model.process.Flow") is None and moved("diffusion_lit.UNet") is None
    hparams = {"net": {"class_path": "diffusion_lit.unet.UNet"}, "guide": [{"class_path": "diffusion_lit.guidance.Guide"}]}
    assert upgrade_paths(hparams) == {"net": {"class_path": "diffusion_lit.nets.unet.UNet"},
                                      "guide": [{"class_path": "diffusion_lit.model.guidance.Guide"}]}
    new = {"net": {"class_path": "diffusion_lit.nets.unet.UNet"}}
    assert upgrade_paths(new) is new


def test_the_trust_rule_names_classes_that_exist_and_every_shipped_source():
    """The rule knows the parts by name (importing them would put it above them): the names must stay true."""
    from diffusion_lit.core.trust import MODULES, PLACES, SOURCES, import_named
    from diffusion_lit.data.sources import SOURCES as SOURCE_CLASSES

    assert SOURCES == {f"{cls.__module__}.{cls.__qualname__}" for cls in SOURCE_CLASSES}
    for name in {n for allowed, base in PLACES.values() for n in (*allowed, base)} | MODULES:
        if not name.startswith("torch.optim."):
            assert isinstance(import_named(name, name), type), name
