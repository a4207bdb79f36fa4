import twins_mm

VARIANTS = [('TwinsPCPVT', 'small'), ('TwinsPCPVT', 'base'), ('TwinsPCPVT', 'large'),
            ('TwinsSVT', 'small'), ('TwinsSVT', 'base'), ('TwinsSVT', 'large')]


def build_backbone(family, arch, **kwargs):
    return getattr(twins_mm, family)(arch=arch, **kwargs)
