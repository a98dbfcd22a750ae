
3159b2a4b09c282dagents/fuzzR
a
https://a.example.com/mcp
http://127.0.0.1:9/mcp
	x-api-keyvs/k Ð"K
p
ax*2è
ay(
az:
a.bsafe-*@
a	file:///*"*