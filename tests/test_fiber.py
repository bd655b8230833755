import pickle

import pytest

from se3t import Fiber


def test_basic_accessors():
    f = Fiber({1: 16, 0: 32})
    assert f.degrees == (0, 1)
    assert f[0] == 32 and f[1] == 16 and f[5] == 0
    assert f.num_features == 32 + 16 * 3
    assert list(f) == [(0, 32), (1, 16)]
    assert 1 in f and 2 not in f


def test_create_and_value_semantics():
    f = Fiber.create(4, 32)
    assert f == Fiber({0: 32, 1: 32, 2: 32, 3: 32})
    assert hash(f) == hash(Fiber({3: 32, 2: 32, 1: 32, 0: 32}))
    assert {f: 1}[Fiber.create(4, 32)] == 1
    assert eval(repr(f)) == f
    assert pickle.loads(pickle.dumps(f)) == f
    assert Fiber({0: 4, 1: 0}) == Fiber({0: 4})


def test_immutable():
    f = Fiber({0: 2})
    with pytest.raises(AttributeError):
        f.foo = 1


def test_arithmetic():
    assert Fiber({0: 2, 1: 4}) + Fiber({1: 1, 2: 3}) == Fiber({0: 2, 1: 5, 2: 3})
    assert Fiber({0: 8, 2: 6}) // 2 == Fiber({0: 4, 2: 3})
    assert 2 * Fiber({1: 3}) == Fiber({1: 6})
    assert Fiber({0: 1, 1: 2, 2: 3}).restrict([0, 2]) == Fiber({0: 1, 2: 3})
    with pytest.raises(TypeError, match="Fiber"):
        Fiber({0: 1}) + 3
    with pytest.raises(TypeError):
        Fiber({0: 1}) * 1.5


@pytest.mark.parametrize("bad", [{-1: 3}, {0: -2}, {0: 1.5}, {"0": 3}])
def test_invalid(bad):
    with pytest.raises(ValueError):
        Fiber(bad)
