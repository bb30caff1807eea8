"""environments"""
__all__: list[str] = []
