def check_tensor(tensor, shape=None, dtype=None, device=None, throw=True):
    return True
