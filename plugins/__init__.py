"""blendsm.plugins: amqtt plugins that turn a broker into a BlendSM marketplace broker."""

from ._marketplace import MarketplacePlugin

__all__ = ["MarketplacePlugin"]
