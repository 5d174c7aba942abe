"""HTTP routes: HTML pages for labelers and admins, and the /api/v1 JSON API."""
