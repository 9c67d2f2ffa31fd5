"""What the contract suites share: pytest imported only when a suite is subclassed."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    import pytest


_Test = TypeVar("_Test", bound=Callable[..., None])


def _cases(
    argnames: tuple[str, ...], argvalues: list[Any], ids: list[str]
) -> Callable[[_Test], _Test]:
    """``pytest.mark.parametrize`` without importing pytest: ``_Contract`` applies it."""

    def mark(test: _Test) -> _Test:
        test._contract_cases = (argnames, argvalues, ids)  # type: ignore[attr-defined]
        return test

    return mark


class _Contract:
    """A suite pytest runs in each ``Test*`` subclass, whose ``backend_factory`` it uses."""

    _fixture_name = ""
    """The fixture each test of the suite takes: built by ``_backend`` from the factory."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        name = cls._fixture_name
        # A suite declares _fixture_name; a subclass of one, in a test module, gets the fixture.
        if "_fixture_name" not in vars(cls) and not hasattr(cls, name):
            import pytest  # only now: a suite is subclassed, in a test module

            suite = next(c for c in cls.__mro__ if "_fixture_name" in vars(c))
            setattr(suite, name, pytest.fixture(_Contract._backend, name=name))

    def _backend(self, backend_factory: Callable[..., Any]) -> Iterator[Any]:
        backend = backend_factory()
        yield backend
        backend.close()

    def pytest_generate_tests(self, metafunc: pytest.Metafunc) -> None:
        """Parametrize the tests marked with ``_cases`` (pytest calls this per test; a
        subclass that defines its own calls ``super().pytest_generate_tests``)."""
        cases = getattr(metafunc.function, "_contract_cases", None)
        if cases is not None:
            argnames, argvalues, ids = cases
            metafunc.parametrize(argnames, argvalues, ids=ids)
