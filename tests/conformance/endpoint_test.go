package conformance

import (
	"encoding/json"
	"os"
	"path/filepath"
	"testing"

	"k8s.io/kms/pkg/util"
)

// endpointRow is one row of testdata/endpoints.json: a kms provider's
// `endpoint` and the name kube-apiserver dials for it (null: refused).
// src/cli/admin/encryption_config/endpoint/tests.rs checks kekd's parser
// (what `kekd admin doctor` reports) against the same file.
type endpointRow struct {
	Endpoint string  `json:"endpoint"`
	Dials    *string `json:"dials"`
}

// TestParseEndpointTable runs every endpoint of testdata/endpoints.json
// through the apiserver's own ParseEndpoint (k8s.io/kms/pkg/util, called by
// kmsv2.NewGRPCService) and requires the file's answer. With
// KEKD_UPDATE_ENDPOINTS=1 it rewrites the answers instead.
func TestParseEndpointTable(t *testing.T) {
	file := filepath.Join("testdata", "endpoints.json")
	text, err := os.ReadFile(file)
	if err != nil {
		t.Fatal(err)
	}
	var rows []endpointRow
	if err := json.Unmarshal(text, &rows); err != nil {
		t.Fatalf("%s: %v", file, err)
	}
	if len(rows) < 30 {
		t.Fatalf("%s: only %d rows", file, len(rows))
	}
	update := os.Getenv("KEKD_UPDATE_ENDPOINTS") == "1"
	for i := range rows {
		row := &rows[i]
		var got *string
		if addr, err := util.ParseEndpoint(row.Endpoint); err == nil {
			got = &addr
		}
		if update {
			row.Dials = got
			continue
		}
		switch {
		case got == nil && row.Dials != nil:
			t.Errorf("endpoint %q: the apiserver refuses it; the table says it dials %q", row.Endpoint, *row.Dials)
		case got != nil && row.Dials == nil:
			t.Errorf("endpoint %q: the apiserver dials %q; the table says it is refused", row.Endpoint, *got)
		case got != nil && *got != *row.Dials:
			t.Errorf("endpoint %q: the apiserver dials %q; the table says %q", row.Endpoint, *got, *row.Dials)
		}
	}
	if update {
		out, err := json.MarshalIndent(rows, "", "  ")
		if err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(file, append(out, '\n'), 0o644); err != nil {
			t.Fatal(err)
		}
	}
}
