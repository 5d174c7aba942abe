"""Accounts: login, logout, each role's home page, and the API's account and token routes.

It fronts every stage (the home pages summarise them), so it may import any of them.
"""
