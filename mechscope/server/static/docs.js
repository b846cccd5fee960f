// Lists the explorer's routes and their schemas from /openapi.json (no third-party viewer, nothing fetched from elsewhere).
"use strict";

function el(tag, text) {
  const node = document.createElement(tag);
  if (text !== undefined) node.textContent = text;
  return node;
}

function schemaText(schema, spec) {
  if (!schema) return "";
  const ref = schema.$ref || (schema.items && schema.items.$ref);
  const name = ref ? ref.split("/").pop() : null;
  const resolved = name ? spec.components.schemas[name] : schema;
  return (name ? name + " " : "") + JSON.stringify(resolved.properties || resolved, null, 1);
}

fetch("/openapi.json").then((r) => r.json()).then((spec) => {
  const root = document.getElementById("routes");
  for (const [path, methods] of Object.entries(spec.paths)) {
    for (const [method, op] of Object.entries(methods)) {
      const box = el("section");
      box.append(el("h2", method.toUpperCase() + " " + path));
      if (op.description || op.summary) box.append(el("p", op.description || op.summary));
      const body = op.requestBody && op.requestBody.content["application/json"].schema;
      if (body) { box.append(el("h4", "request")); box.append(el("pre", schemaText(body, spec))); }
      const ok = op.responses["200"] && op.responses["200"].content;
      if (ok) { box.append(el("h4", "response")); box.append(el("pre", schemaText(ok["application/json"].schema, spec))); }
      root.append(box);
    }
  }
});
