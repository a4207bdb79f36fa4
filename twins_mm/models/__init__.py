from twins_mm.registry import register_everywhere

from .twins import TwinsPCPVT, TwinsSVT

register_everywhere(TwinsPCPVT, TwinsSVT)

__all__ = ['TwinsPCPVT', 'TwinsSVT']
