def load_config():
    raise ValueError("config file is missing")


CONFIG = load_config()
