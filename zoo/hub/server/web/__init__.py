"""The web view of ``zoo serve``: the zoo, model pages and compare, as server-rendered
HTML under ``/ui``, with the API's visibility rules (see ``access``)."""

from zoo.hub.server.web.pages import WebApp

__all__ = ["WebApp"]
