"""Every registered model name is a module-level function of its models_* module, as the reference
notebooks and READMEs call them (`getattr(models_mae, arch)()`, `models_vit.__dict__['RETFound_mae'](...)`)."""
import importlib
import inspect

import pytest

import models_convmae
import models_crossmae
import models_ibot
import models_mae
import models_medclip
import models_slip
import models_vit
from util import registry

MODULES = (models_vit, models_mae, models_convmae, models_crossmae, models_ibot, models_slip, models_medclip)


def test_module_attributes_and_registry_agree():
    exported = {}
    for module in MODULES:
        for name, fn in vars(module).items():
            if inspect.isfunction(fn) and registry.is_registered(name) and getattr(fn, "__module__", "") == module.__name__:
                exported[name] = fn
    registered = set(registry.list_models())
    assert registered == set(exported), sorted(registered ^ set(exported))
    for name, fn in exported.items():
        assert (fn.__doc__ or "").strip(), f"{name} has no docstring"
        if name not in registry._DEPRECATED:
            assert registry._FACTORIES[name] is fn


@pytest.mark.parametrize("module,name", [(models_mae, "mae_vit_base_patch16"), (models_mae, "mae_vit_base_patch16_dec512d8b"),
                                         (models_mae, "dmae_vit_tiny_patch8"),
                                         (models_convmae, "convmae_convvit_base_patch16"),
                                         (models_convmae, "convvit_micro_patch16"),
                                         (models_crossmae, "crossmae_vit_base_patch16")])
def test_reference_notebook_getattr(module, name):
    assert callable(getattr(module, name))


def test_retfound_readme_call_builds_a_classifier():
    model = models_vit.__dict__["RETFound_mae"](num_classes=5, drop_path_rate=0.2, global_pool=True)
    assert model.head.out_features == 5 and model.pool == "mae_avg"
    assert type(model) is type(models_vit.vit_micro_patch8())


def test_deprecated_name_is_a_module_function_that_builds_its_target():
    fn = models_mae.mae_vit_large_patch16_cross_attention
    assert "Deprecated" in fn.__doc__
    assert registry.resolve("mae_vit_large_patch16_cross_attention") == "mae_vit_large_patch16"


def test_reimport_does_not_break_registration():
    # A notebook re-running its import cell must not raise "registered twice".
    importlib.reload(models_vit)
    assert callable(models_vit.vit_base_patch16)
