// Reads a JSON array of ServiceMonitor objects on stdin and checks each against the schema that
// @kubernetes-models/prometheus-operator generated from prometheus-operator's CRDs. Prints one JSON
// line per object, {"name", "errors"}, and exits 1 if any object fails.
"use strict";
const { ServiceMonitor } = require("@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1/ServiceMonitor");

let input = "";
process.stdin.on("data", (chunk) => { input += chunk; });
process.stdin.on("end", () => {
  let failed = false;
  for (const object of JSON.parse(input)) {
    let errors = [];
    try {
      new ServiceMonitor(object).validate();
    } catch (error) {
      errors = [String(error.message)];
      failed = true;
    }
    console.log(JSON.stringify({ name: object.metadata && object.metadata.name, errors }));
  }
  process.exit(failed ? 1 : 0);
});
