"""The former module paths and names answer for one release, with a DeprecationWarning: each old module path
is the moved module itself; a package that took a former module's name answers that module's names."""

import importlib
import sys

import pytest

import kvlib

MOVED = {
    "kvlib.data": "kvlib.assets.data",
    "kvlib.grading": "kvlib.assets.grading",
    "kvlib.cache": "kvlib.core.cache",
    "kvlib.decoding": "kvlib.core.decoding",
    "kvlib.pooling": "kvlib.core.pooling",
    "kvlib.memory": "kvlib.core.memory",
    "kvlib.models": "kvlib.core.models",
    "kvlib.tiny": "kvlib.core.tiny",
    "kvlib.model_info": "kvlib.core.model_info",
    "kvlib.paths": "kvlib.core.paths",
    "kvlib.identity": "kvlib.runs.identity",
    "kvlib.writer_lock": "kvlib.runs.writer_lock",
    "kvlib.records": "kvlib.runs.records",
    "kvlib.store": "kvlib.runs.store",
    "kvlib.sharding": "kvlib.runs.sharding",
    "kvlib.generation": "kvlib.runs.generation",
    "kvlib.replay": "kvlib.runs.replay",
    "kvlib.sampling": "kvlib.runs.sampling_settings",
    "kvlib.probe": "kvlib.embedding.mteb_classification",
    "kvlib.textsets": "kvlib.embedding.textsets",
    "kvlib.probe_stats": "kvlib.embedding.classification_stats",
    "kvlib.coe": "kvlib.selfeval.coe",
    "kvlib.answer_probe": "kvlib.selfeval.trained_probes",
    "kvlib.metrics": "kvlib.selfeval.metrics",
    "kvlib.thinking": "kvlib.switching.thinking",
    "kvlib.difficulty": "kvlib.switching.difficulty",
    "kvlib.adaptive": "kvlib.switching.kv_switch",
    "kvlib.early_exit": "kvlib.switching.early_exit",
    "kvlib.answers": "kvlib.switching.answers",
}
FORMER = {'kvlib.embedding': 'kvlib.embedding.embedders', 'kvlib.selfeval': 'kvlib.selfeval.scores'}  # package -> the
# module its former namesake became
RENAMED = {'Prefill': ('embedding.embedders', 'PrefillRunner')}  # kvlib.<old name> -> (module, new name)


@pytest.mark.parametrize("old,new", sorted(MOVED.items()))
def test_a_former_module_path_is_the_moved_module(old, new):
    module = importlib.import_module(new)
    sys.modules.pop(old, None)
    with pytest.warns(DeprecationWarning, match=new.replace(".", r"\.")):
        shim = importlib.import_module(old)
    assert shim is module and sys.modules[old] is module


@pytest.mark.parametrize("package,module", sorted(FORMER.items()))
def test_a_package_answers_the_names_of_its_former_namesake(package, module):
    former = importlib.import_module(module)
    names = [n for n in getattr(former, "__all__", []) if not n.startswith("_")]
    assert names
    for name in names:
        with pytest.warns(DeprecationWarning, match="became a package"):
            assert getattr(importlib.import_module(package), name) is getattr(former, name)


@pytest.mark.parametrize("old", sorted(RENAMED))
def test_a_renamed_public_name_still_answers(old):
    module, new = RENAMED[old]
    with pytest.warns(DeprecationWarning, match=new):
        assert getattr(kvlib, old) is getattr(importlib.import_module(f"kvlib.{module}"), new)
