
4f833b6576fa3077agents/fuzzZ
gh!
https://mcp.example.com/mcp?x=1-
authorizationBearer ghp_xgh-token/token ђї"7
triage
ghget_*list_*2<аФ
ghdelete_*(