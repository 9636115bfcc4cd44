"""The built-in web playground and live status page, served at ``/`` by the API's own app.

Plain static files (HTML, CSS, one small ES module) shipped inside the package: no build step,
no CDN, so the page works offline and from an installed wheel. ``--no-ui`` turns it off.
"""
