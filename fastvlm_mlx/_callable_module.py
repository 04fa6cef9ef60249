"""Modules that can be called like their main function.

`fastvlm_mlx.generate` must be both the generate module (so that `import fastvlm_mlx.generate
as g` and `python -m fastvlm_mlx.generate` mean what they say) and callable as the function the
README documents, `fastvlm_mlx.generate(model, processor, ...)`, as in mlx-lm. A module's class
may be replaced by a ModuleType subclass (the documented hook, "Customizing module attribute
access"); this one only adds `__call__`.
"""

import sys
import types


class CallableModule(types.ModuleType):
    def __call__(self, *args, **kwargs):
        """Call the module's function of the same name (generate.generate, convert.convert)."""
        return getattr(self, self.__name__.rpartition(".")[2])(*args, **kwargs)


def make_callable(module_name: str) -> None:
    sys.modules[module_name].__class__ = CallableModule
