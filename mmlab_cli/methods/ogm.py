"""placeholder"""
def build(cfg, model, world):
    return None
